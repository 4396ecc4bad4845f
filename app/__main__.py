"""`python -m app` is `tunesmith`: the window without a command, else the command line."""

from app.launch import main

raise SystemExit(main())
