from deepspec.cli import main

raise SystemExit(main())
