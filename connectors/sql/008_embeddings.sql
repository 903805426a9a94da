-- requires: vector
-- Semantic search: one normalised sentence embedding per review and embedding model,
-- written by the emotions pass, searched by cosine distance through an HNSW index.
-- Needs the pgvector extension (the embedded datalake and the compose image have it);
-- on a Postgres without it this migration waits, and search says what is missing.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE review_embeddings (
    review_id   text NOT NULL,
    model       text NOT NULL,
    embedding   vector(384) NOT NULL,
    embedded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (review_id, model)
);
CREATE INDEX review_embeddings_hnsw_idx ON review_embeddings
    USING hnsw (embedding vector_cosine_ops);
