#!/usr/bin/python3 -I
"""Entry point of the kubespan system extension: runs the bundled package with the
guest's Python; its dependencies live in a private site-packages directory."""

import sys

sys.path.insert(0, "/usr/lib/kubespan/site-packages")

from kubespan.cli import main

sys.exit(main())
