"""Container HEALTHCHECK: healthy when the service answers /readyz with 200 (model loaded, warmed up)."""

import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('SERVABLE_PORT', '3000')}/readyz"
try:
    with urllib.request.urlopen(url, timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
