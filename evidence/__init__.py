"""Evidence for a run: membership-inference attacks, utility, the bound and cost, side by side
with a backprop baseline (``sottovoce evaluate``). A tool for data holders and auditors: it
needs the training data, so it runs where the data is, never at the coordinator."""
