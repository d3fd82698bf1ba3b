import sys

from m2rnn_jax.cli import main

sys.exit(main())
