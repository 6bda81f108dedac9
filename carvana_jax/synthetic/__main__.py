import sys

from carvana_jax.synthetic import dataset

sys.exit(dataset.main())
