"""The label audit: which given labels are wrong, and how well a ranking finds them."""
