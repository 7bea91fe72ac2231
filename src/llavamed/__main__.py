from llavamed.cli import main

raise SystemExit(main())
