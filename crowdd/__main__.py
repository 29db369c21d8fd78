from crowdd.cli import main

raise SystemExit(main())
