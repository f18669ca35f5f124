"""The Hugging Face Hub: naming and loading of components, the self-contained remote code, cards, pushes."""
