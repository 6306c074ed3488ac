"""The status pages (``/ui``) of the daemon and of ``cdm serve``: server-rendered HTML, no build step, no external
asset.

* ``collect.StatusPage`` reads what a page shows (registry, served composition, this process) into
  ``model.Page``; a part that cannot be read becomes an unavailable section under a banner.
* ``grids.GridCache`` draws the sample grid in the background, cached per (epoch, sources): a view never samples.
* ``render`` turns a page into HTML (Jinja2 templates in ``templates/``, shipped as package data).
* ``serve.build_ui_router`` is ``/ui`` on ``cdm serve`` (bearer token or sign-in cookie; the caller's sources);
  ``api.health.create_health_app(..., ui=...)`` is ``/ui`` on the daemon (every source).

A source's colour comes from its name (``cdm.viz.source_colour``), the same in the grid, the legend and the tables.
"""

from api.ui.collect import StatusPage, refresh_of
from api.ui.grids import GridCache, GridSpec
from api.ui.model import LocalStatus, Progress
from api.ui.render import status_page

__all__ = ["GridCache", "GridSpec", "LocalStatus", "Progress", "StatusPage", "refresh_of", "status_page"]
