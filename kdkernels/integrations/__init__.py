"""Drop-in integrations with training frameworks (Hugging Face Trainer, TRL)."""
