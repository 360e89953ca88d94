from powercrud.async_dashboard import ModelTrackingAsyncManager


class DashboardManager(ModelTrackingAsyncManager):
    """Lifecycle events go to ``viewerapp.AsyncTaskRecord`` (user label: ``user:<name>``)."""

    record_model_path = "viewerapp.AsyncTaskRecord"

    def format_user(self, user):
        if not user:
            return ""
        return f"user:{user.get_username()}"
