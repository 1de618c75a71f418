"""leakkit: measure how much private training data leaks through shared gradients.

Nothing heavy is imported here, so `leakkit --help` stays instant; import what you need:

    from leakkit.tasks import ImageClassification
    from leakkit.engine.matching import AttackConfig, reconstruct
    from leakkit.client.victim import observe
"""

__version__ = "0.1.0"
