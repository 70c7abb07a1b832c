from fsys.master.cli import main

raise SystemExit(main())
