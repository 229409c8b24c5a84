"""SiteBridge's Flower ServerApp: the coordinator's phase pipeline, run store, report."""
