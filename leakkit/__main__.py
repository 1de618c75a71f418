from leakkit.cli import main

raise SystemExit(main())
