"""`python -m cwm_connector.demo`: the first-run demo."""

import sys

from cwm_connector.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
