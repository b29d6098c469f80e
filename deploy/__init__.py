"""Deployment recipes: the voice agent and its engine on a Ray cluster (ray_app.py, serve.yaml)."""
