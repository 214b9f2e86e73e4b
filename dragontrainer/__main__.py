"""`python -m dragontrainer ...` is `dragon ...`; what torchrun launches (`torchrun -m dragontrainer train ...`)."""

from dragontrainer.cli import main

raise SystemExit(main())
