"""The crawler: search queries to web images to aligned faces to shards, and the embedded web for demos and tests."""
