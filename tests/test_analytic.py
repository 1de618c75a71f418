import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from leakkit.engine import analytic
from leakkit.engine.labels import LABELS
from leakkit.tasks import ImageClassification
from leakkit.client.victim import observe
from conftest import real_image


def _setup(batch, labels, seed=0, size=16, classes=10):
    torch.manual_seed(seed)
    task = ImageClassification.from_name("lenet", num_classes=classes, image_size=size)
    x = torch.stack([torch.from_numpy(real_image(size, i)) for i in range(batch)])
    obs = observe(task, x, torch.tensor(labels))
    return task, x, obs


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_distinct_labels_are_recovered_exactly(data):
    batch = data.draw(st.integers(1, 6))
    labels = data.draw(st.lists(st.integers(0, 99), min_size=batch, max_size=batch, unique=True))
    task, x, obs = _setup(batch, labels, seed=data.draw(st.integers(0, 100)), classes=100)
    # the documented condition: no present class gets a total probability of 1 or more
    with torch.no_grad():
        total = torch.softmax(task.model(x), dim=-1).sum(0)
    assume(all(float(total[c]) < 1 for c in labels))
    got = analytic.label_counts(obs.gradients["fc.weight"], obs.gradients["fc.bias"], batch)
    assert got == sorted(labels)


def test_idlg_label_with_and_without_bias():
    for label in (0, 4, 9):
        _, _, obs = _setup(1, [label])
        assert analytic.label_single(obs.gradients["fc.weight"], obs.gradients["fc.bias"]) == label
        # without a bias, the row sums of the weight gradient carry the sign (sigmoid features >= 0)
        assert analytic.label_single(obs.gradients["fc.weight"], None) == label


def test_saturated_softmax_label_comes_from_the_models_prediction():
    # the client's model is so sure of class 6 that its float32 gradient has no negative entry, and
    # class 0's probability underflows: both gradients are exactly 0, and the sign rule picks class 0
    torch.manual_seed(0)
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=16)
    x = torch.from_numpy(real_image(16, 0))[None]
    fc = task.model.fc
    with torch.no_grad():
        fc.bias[6] += 40.0 - float(task.model(x)[0, 6] - task.model(x)[0].max())
        fc.bias[0] -= 200.0
    obs = observe(task, x, torch.tensor([6]))
    gW, gb = obs.gradients["fc.weight"], obs.gradients["fc.bias"]
    assert float(gb.min()) >= 0 and analytic.label_single(gW, gb) == 0  # the sign rule has nothing to read
    assert analytic.label_single(gW, gb, fc.weight.detach(), fc.bias.detach()) == 6
    assert int(LABELS.get("idlg")(obs, task).argmax()) == 6


def test_repeated_labels_are_estimated_with_the_right_total():
    _, _, obs = _setup(4, [2, 2, 2, 7])
    got = analytic.label_counts(obs.gradients["fc.weight"], obs.gradients["fc.bias"], 4)
    assert len(got) == 4 and set(got) == {2, 7}


def test_label_strategies_return_distributions():
    task, _, obs = _setup(1, [6])
    onehot = LABELS.get("idlg")(obs, task)
    assert onehot.shape == (1, 10) and int(onehot.argmax()) == 6
    assert LABELS.get("soft")(obs, task) is None


def test_linear_layer_input_is_exact_for_one_example():
    task, x, obs = _setup(1, [3])
    with torch.no_grad():
        features = task.model.body(x).flatten(1)[0].double()
    got = analytic.linear_layer_input(obs.gradients["fc.weight"].double(), obs.gradients["fc.bias"].double())
    assert torch.allclose(got, features, rtol=1e-4, atol=1e-6)


def test_linear_layer_inputs_separate_a_batch():
    labels = [1, 4, 6, 8]
    task, x, obs = _setup(4, labels)
    with torch.no_grad():
        features = task.model.body(x).flatten(1).double()
    Y = torch.nn.functional.one_hot(torch.tensor(labels), 10).double()
    H, residual = analytic.linear_layer_inputs(obs.gradients["fc.weight"], obs.gradients["fc.bias"], task.model.fc.weight, task.model.fc.bias, Y)
    rel = (H - features).norm(dim=1) / features.norm(dim=1)
    assert float(rel.max()) < 1e-4 and residual < 1e-8
    # wrong labels cannot fit the gradient: the residual says so
    wrong = torch.nn.functional.one_hot(torch.tensor([1, 4, 6, 9]), 10).double()
    _, bad = analytic.linear_layer_inputs(obs.gradients["fc.weight"], obs.gradients["fc.bias"], task.model.fc.weight, task.model.fc.bias, wrong)
    assert bad > 1e-4


def _confident_victim(labels, confident, boost=6.0):
    """A real LeNet whose output bias makes every example predict `confident` with p > 0.99."""
    torch.manual_seed(0)
    task = ImageClassification.from_name("lenet", num_classes=10, image_size=16)
    with torch.no_grad():
        task.model.fc.bias[confident] += boost
    x = torch.stack([torch.from_numpy(real_image(16, i)) for i in range(len(labels))])
    with torch.no_grad():
        assert float(torch.softmax(task.model(x), dim=-1)[:, confident].min()) > 0.99
    return task, observe(task, x, torch.tensor(labels))


def test_a_confidently_predicted_present_class_is_found_by_the_residual():
    labels = [1, 4, 6, 8]
    task, obs = _confident_victim(labels, confident=6)
    gW, gb = obs.gradients["fc.weight"], obs.gradients["fc.bias"]
    # the sign rule alone cannot see class 6: the others' probabilities outweigh its label
    assert 6 not in analytic.label_counts(gW, gb, 4)
    got, residual = analytic.label_search(gW, gb, task.model.fc.weight, task.model.fc.bias, 4)
    assert got == sorted(labels) and residual < analytic.LABEL_FIT
    onehot = LABELS.get("batch")(obs, task)
    assert sorted(int(c) for c in onehot.argmax(dim=1)) == sorted(labels)


def test_label_search_keeps_repeats_and_plain_batches():
    labels = [2, 2, 5]
    task, x, obs = _setup(3, labels)
    got, residual = analytic.label_search(obs.gradients["fc.weight"], obs.gradients["fc.bias"], task.model.fc.weight, task.model.fc.bias, 3)
    # repeats are harder to separate: the fit is looser but still far below a wrong set's (> 1e-4)
    assert got == labels and residual < 1e-6
    task, x, obs = _setup(3, [0, 3, 9])
    got, _ = analytic.label_search(obs.gradients["fc.weight"], obs.gradients["fc.bias"], task.model.fc.weight, task.model.fc.bias, 3)
    assert got == [0, 3, 9]
