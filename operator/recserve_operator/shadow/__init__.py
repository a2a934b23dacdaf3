"""Shadow comparator: compares the candidate's answers with the stable's on mirrored live requests."""
