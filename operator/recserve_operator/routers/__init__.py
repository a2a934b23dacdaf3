"""Traffic routers: the pure traffic plan and its Gateway API and built-in nginx renderings."""
