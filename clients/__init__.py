"""SiteBridge's Flower ClientApp: one handler per action; decode, call core, encode."""
