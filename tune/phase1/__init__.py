"""Phase 1 (the shared prompt): its key, its content-addressed cache and lock, and training it up front."""
