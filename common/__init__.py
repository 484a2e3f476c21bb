"""The ground floor: what every role needs, importing none of them, nor torch or transformers."""
