"""A dataset file's contents: its format and readers, the row rules, lengths, and the validation that
ties them to a dataset record."""
