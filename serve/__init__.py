"""Ray Serve application for multimodal rerankers: ingress -> router -> arm replica -> engine."""
