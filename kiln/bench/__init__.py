"""`kiln bench`: a model, run or compiled directory timed under MLPerf LoadGen's scenarios."""
