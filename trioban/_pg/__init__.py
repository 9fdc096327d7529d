"""The database boundary: the Trio-native driver (``_driver``, the only code that knows
psycopg internals) and the connection pool built on it (``_pool``). Everything above imports
from here."""

from __future__ import annotations

from ._driver import CONNECT_TIMEOUT as CONNECT_TIMEOUT
from ._driver import Connection as Connection
from ._driver import DatabaseUnavailable as DatabaseUnavailable
from ._driver import connect as connect
from ._driver import transient as transient
from ._driver import with_options as with_options
from ._pool import CHECKOUT_TIMEOUT as CHECKOUT_TIMEOUT
from ._pool import TICK_TIMEOUT as TICK_TIMEOUT
from ._pool import Pool as Pool
from ._pool import PoolStatistics as PoolStatistics
from ._pool import PoolTimeout as PoolTimeout
from ._pool import bounded as bounded
from ._pool import open_pool as open_pool
