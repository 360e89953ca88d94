"""Template context of the sample's pages."""

from __future__ import annotations


def sample(request):
    from sample.library.views import viewer_url

    return {"taskctx_viewer_url": viewer_url()}
