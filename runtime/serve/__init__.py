"""pid-serve: PiD decoding as a Ray Serve application (`pip install 'pid-export[serve]'`).

`Client` needs only the standard library and numpy; the service (`pid_runtime.serve.app`)
imports Ray and FastAPI, so it is imported only by pid-serve and Ray's replicas.
"""

from .client import Client, ServeError
from .settings import ServeSettings

__all__ = ["Client", "ServeError", "ServeSettings"]
