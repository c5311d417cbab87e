from migrated.cli import main

raise SystemExit(main())
