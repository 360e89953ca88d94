"""URLs of the sample's library app (namespace ``library``)."""

from sample.library import views

app_name = "library"

urlpatterns = views.crud_urls()
