"""prlhf: personalized language models from personalized human feedback (P-RLHF / P-DPO).

Li, Lipton & Leqi, "Personalized Language Modeling from Personalized Human Feedback", arXiv 2402.05133.
"""

__version__ = "0.1.0"
