-- Emotions of reviews, one row per (review, model), so several models can coexist.
-- No foreign key to reviews: inline classification upserts both tables in parallel.

CREATE TABLE review_emotions (
    review_id     text NOT NULL,
    model         text NOT NULL,
    label         text NOT NULL,
    score         real NOT NULL,
    scores        jsonb NOT NULL,
    classified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (review_id, model)
);
CREATE INDEX review_emotions_model_label_idx ON review_emotions (model, label);
