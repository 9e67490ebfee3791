from dsjax.cli import main

raise SystemExit(main())
