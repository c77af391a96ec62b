from cowfleet.cli.main import main

raise SystemExit(main())
