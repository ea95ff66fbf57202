"""Ranking metrics: a leaf package (scipy only) that the serving layer and the tools both import."""
