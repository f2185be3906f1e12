from cbsd.cli.main import main

raise SystemExit(main())
