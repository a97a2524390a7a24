from scanside.simulator.cli import main

raise SystemExit(main())
