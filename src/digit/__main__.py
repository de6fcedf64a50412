from digit.cli import main

raise SystemExit(main())
