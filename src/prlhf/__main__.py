from prlhf.cli.main import main

raise SystemExit(main())
