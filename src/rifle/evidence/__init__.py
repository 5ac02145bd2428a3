"""From MLflow runs to evidence: statistics (stats), the paper-style and paired tables (tables), the report
(build: files, figures and their MLflow logging), figures and the notebooks' helpers (notebook)."""
