"""Retrieval serving on Ray Serve: the offline index job, the deployments and the HTTP app.

    serve.config       typed schema (`AppConfig`: index + serve sections) for both commands
    serve.store        the index directory: embeddings Parquet, faiss index, metadata, recall
    serve.index        `clipray index`: Ray Data batch job that embeds a manifest's clips
    serve.deployments  TextEncoder, VideoEncoder (batched), Searcher (batched faiss), Reranker
    serve.app          FastAPI ingress, validation, search page, and the builder `build_app`
    serve.__main__     `clipray serve`: start the app on Ray and block
    serve.smoke_model  a quick plain-PyTorch fit of a tiny model (tests and demos only)
    serve.demo_step    the serving step of `clipray demo`

Importing this package imports nothing heavy (no Ray, no torch).
"""
