"""The ablax model directory (a trained or imported model on disk) and its Hugging Face form."""
