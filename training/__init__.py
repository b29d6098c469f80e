"""Making models for the engine: data and tokenizers (`data`, `bpe`), teacher replies (`distill`),
configs (`config`), training rows (`batches`), the objective (`objective`) and the loop with its
checkpoints and export (`loop`). It imports the engine's model code; the engine never imports this.
"""
