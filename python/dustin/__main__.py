# SPDX-License-Identifier: Apache-2.0
"""``python -m dustin``: the ``dustin`` command line (see ``dustin.cli``)."""

import sys

from dustin.cli import main

sys.exit(main())
