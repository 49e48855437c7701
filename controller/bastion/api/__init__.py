"""The controller's HTTP API: public boot endpoints, assets, the authenticated management API,
health and metrics. `bastion.api.main.create_app(settings)` builds the FastAPI application."""
