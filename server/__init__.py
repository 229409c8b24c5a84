"""SiteBridge's Flower ServerApp: the coordinator's phases, run store and report."""
