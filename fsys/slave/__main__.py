from fsys.slave.cli import main

raise SystemExit(main())
