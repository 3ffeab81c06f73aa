"""Sequential recommendation on top of pka_ext: data readers, evaluation protocols, models."""
